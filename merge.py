"""python merge.py --help: see README.md. The logic lives in kfdeb/ (cli.merge_main, merge.main)."""

from kfdeb import cli

if __name__ == "__main__":
    cli.execute(cli.merge_main)
