"""python evaluate.py --help: see README.md. The logic lives in kfdeb/ (cli.evaluate_main)."""

from kfdeb import cli

if __name__ == "__main__":
    cli.execute(cli.evaluate_main)
