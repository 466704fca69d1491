"""Offline training of stacked-LSTM text models and their export to the model store."""
