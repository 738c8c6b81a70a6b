"""The report's experiment: recipes, stages, Table 1 and the figures (`pneumo experiment`, `pneumo demo`)."""
