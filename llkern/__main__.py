from llkern.cli import main

main()
