"""``python -m medseg.data.synthetic``: the twin's command line (``cli.main``) under the shared CLI contract."""
from medseg.cli import run_cli
from medseg.data.synthetic.cli import main

if __name__ == "__main__":
    run_cli(main)
