"""Safety filters on input and output, one module per filter behind `base.SafetyFilter`.

`pii`, `injection` and `blocklist` are the filters; `pipeline` applies a policy's actions to
their findings; `policy` builds pipelines from a deployment's `SafetyPolicy` (the only module
here that reads the database).
"""
