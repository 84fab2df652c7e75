from zsqpipe.cli import main

main()
