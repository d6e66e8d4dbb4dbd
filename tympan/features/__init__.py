"""tympan.features"""
