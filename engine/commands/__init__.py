"""The user commands beside training and evaluation (`neox-distill SUB`; engine/cli.py)."""
