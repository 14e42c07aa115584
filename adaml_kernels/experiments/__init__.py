"""Small-scale reproductions of the AdamL paper's claims (Xia & Massei, arXiv 2312.15295).

Run them with the console script `adaml-experiments` (see cli.py); docs/results.md is generated
by `adaml-experiments report`. Every data set ships with a package: nothing is downloaded.
"""
