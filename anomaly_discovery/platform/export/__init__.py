"""What the review decided, out of the store: CSV, COCO and folder-per-class exports, the HTML report, the
Pareto and trend tables and charts the dashboard offers as downloads (issue 15)."""
