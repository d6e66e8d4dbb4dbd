"""tympan.inference"""
