"""The report's experiment: recipes, stages, Table 1 and the figures.

`pneumo experiment` and `pneumo demo` run it. ``experiment`` imports every other part;
only the CLI imports it.
"""
