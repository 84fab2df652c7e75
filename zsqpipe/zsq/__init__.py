"""Zero-shot quantization building blocks: BN-statistics losses, sample synthesis, generators, ZSQ losses."""
