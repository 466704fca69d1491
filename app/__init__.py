"""lstm-serve: the HTTP service that serves stacked-LSTM text models from model_store/."""
