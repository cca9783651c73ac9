"""The ApolloMoE release's evaluation protocol (`medmoe eval mcq --protocol apollomoe`), reproduced from its files:
prompts (prompts.py, templates.yaml), answer extraction (answers.py) and its per-language numbers (scoring.py,
sources.yaml). Our own protocol is the package above; docs/evaluation.md lists the differences."""
