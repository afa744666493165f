"""From anomaly maps to regions: MEBin, anomaly-centred crops, region records and the object prior."""
