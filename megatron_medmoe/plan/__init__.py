"""`medmoe plan`: which parallel layouts fit a recipe on N nodes, what each costs in memory and
communication per GPU, and where the family experts should sit."""
