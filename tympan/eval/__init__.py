"""tympan.eval"""
