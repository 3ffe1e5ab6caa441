"""Ray preprocessing (sources, preprocess) and the training loader."""
