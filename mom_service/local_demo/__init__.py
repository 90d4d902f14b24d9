"""The local demo (`mom-service demo`, `make demo`): a real panel of small models on a local llama.cpp server,
offline. install.py puts the server and the model into the environment, llama_server.py starts the server,
config.py writes the demo's config for it, command.py runs both servers until Ctrl-C."""
