"""python evaluate.py --help: see README.md. The logic lives in kfdeb/ (cli.evaluate_main)."""

from kfdeb import cli

if __name__ == "__main__":
    cli.run(cli.evaluate_main)
