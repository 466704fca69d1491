"""The HTTP layer: thin routes that read a request, call one function of the domain and return a schema."""
