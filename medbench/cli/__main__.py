from medbench.cli import main

main()
