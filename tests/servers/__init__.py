"""Contract-faithful stand-ins for backends that cannot run here (TEI, Elasticsearch).

Each speaks its backend's real routes, fields, status codes and error bodies, validates every request
it receives and every response it sends against tests/contracts, takes its vectors from a real
llama.cpp server, and injects faults on demand.
"""
