"""Ray Train and Ray Tune around the plain training functions of models/."""
