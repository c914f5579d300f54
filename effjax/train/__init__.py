"""Trainer: `python -m effjax.train --config=configs/NAME.py --workdir=DIR [--config.k=v ...]`."""
