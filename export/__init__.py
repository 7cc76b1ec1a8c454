"""Everything that makes the models: phantoms, networks, training, evaluation, export."""
