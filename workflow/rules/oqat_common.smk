# Helpers of workflow/rules/oqat.smk (OQAT, docs/methods/oqat.md); included from there, after common.smk.
OQAT = config["oqat"]
if any(a <= b for a, b in zip(OQAT["bits"], OQAT["bits"][1:])):
    sys.exit(
        f"zsqpipe: invalid config: config key 'oqat.bits': {OQAT['bits']} is not strictly decreasing "
        "(each bit-width inherits from the previous one)"
    )
OQAT_DIR = f"{RESULTS}/nas/oqat/{{dataset}}/w{{obits}}/seed{{seed}}"


def oqat_parent_bits(obits):
    """The bit-width a supernet inherits from (None for the first of oqat.bits)."""
    i = OQAT["bits"].index(int(obits))
    return OQAT["bits"][i - 1] if i else None


def oqat_train_params(wildcards):
    recipe = dict(OQAT["train"])
    if oqat_parent_bits(wildcards.obits) is not None:
        recipe.update(OQAT["finetune"])
    return canonical_json(recipe)


def oqat_parent_input(wildcards):
    parent = oqat_parent_bits(wildcards.obits)
    if parent is None:
        return []
    return [f"{OQAT_DIR}/supernet.pt".format(dataset=wildcards.dataset, obits=parent, seed=wildcards.seed)]


def oqat_inherit_flag(wildcards, input):
    return f"--inherit-from {input.parent}" if input.parent else ""


def oqat_searches(wildcards):
    return [
        f"{OQAT_DIR}/search.json".format(dataset=d, obits=b, seed=s)
        for d in OQAT["datasets"]
        for b in OQAT["bits"]
        for s in OQAT["seeds"]
    ]
