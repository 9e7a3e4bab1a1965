"""Results as data and files: JSON blocks, document, tables, pictures, prompt sets, merge."""
