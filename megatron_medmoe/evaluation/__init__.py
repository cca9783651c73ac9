"""Multiple-choice medical exams: question files, few-shot prompts, answer extraction and accuracy, in our protocol
and in the ApolloMoE release's (apollomoe/); protocol.py puts both behind one interface."""
