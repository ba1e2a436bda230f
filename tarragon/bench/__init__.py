"""`tarragon bench` and the bench/ experiment scripts: load an OpenAI-compatible server with
streaming requests, inject worker faults on a schedule, and report what the clients saw.

One module per job, so that each can be used alone: `workload` (requests and arrival times),
`client` (the streaming load client), `report` (figures, text, JSON), `plot` (the PNG timeline),
`server` (a `tarragon serve` of our own), `experiments` (what the bench/ scripts share) and
`command` (the CLI command). Fault specs and the stall are `tarragon.faults`'.
"""
