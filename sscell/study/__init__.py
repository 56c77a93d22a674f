"""The study's published models (theislab/ssl_in_scg Lightning checkpoints) in sscell, and back.

checkpoint.py  PyTorch zip checkpoints read (restricted unpickler: no code runs) and written, without torch
layout.py      the study's modules' state dicts <-> sscell parameters and model settings
importer.py    from_study(checkpoint, genes) -> sscell.api.Model
export.py      Model.export_study: an sscell model as the study's checkpoint
"""
