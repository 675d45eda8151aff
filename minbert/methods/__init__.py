"""The methods: how a step's task losses become updates (combiners.py: the report's ``individual``, ``sum``,
``pcgrad``, ``gse``; mtl_methods.py and mtl_combiners.py: torchjd's aggregators and loss weightings;
user_combiner.py: a user's own), SMART (smart.py) and the optimizers, M-FAC among them (optim/)."""
