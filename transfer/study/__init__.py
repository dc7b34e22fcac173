"""The feature study behind ``benchmarks/table2.py``: context-encoder pretraining against random init.

``budgets`` holds the rows, columns, budgets and the fixed data split; ``cells`` pretrains or initialises a row and
runs one transfer per cell, resuming finished ones from ``results.json``; ``report`` writes the tables and figure.
The script keeps only the command line.
"""
