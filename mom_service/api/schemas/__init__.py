"""The wire models of each protocol, one module per protocol: requests validated, responses built."""
