"""seedlm: grow your own language model, and your own chatbot, from your own data."""
