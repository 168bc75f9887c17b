"""python train.py --help: see README.md. The logic lives in kfdeb/ (cli.train_main)."""

from kfdeb import cli

if __name__ == "__main__":
    cli.execute(cli.train_main)
