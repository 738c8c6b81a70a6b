"""The report's experiment: recipes, stages, Table 1 and the figures.

`pneumo experiment` and `pneumo demo` run it.
"""
