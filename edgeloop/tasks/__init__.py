"""Task plug-ins: data, preprocessing, models and metrics for one ML problem."""
