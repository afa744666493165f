"""Novel-class discovery: AMGA network, prototypes, losses, training, class count, region merging and outliers."""
