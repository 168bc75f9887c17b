"""python mine.py --help: see README.md. The logic lives in kfdeb/ (cli.mine_main)."""

from kfdeb import cli

if __name__ == "__main__":
    cli.execute(cli.mine_main)
