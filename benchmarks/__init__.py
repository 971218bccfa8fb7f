"""The benchmarks, in one place and above the layers they measure: each is a command that prints
a table and writes a JSON result (machine, date, commit and command inside).

May import anything in the package but ``cli``.
"""
