"""The bocompress worker: compression methods, the model zoo, calibration data and evaluation."""
