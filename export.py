"""python export.py --help: see README.md. The logic lives in kfdeb/ (cli.export_main, kfdeb/onnx.py)."""

from kfdeb import cli

if __name__ == "__main__":
    cli.execute(cli.export_main)
