from fqtrun.cli import main

main()
