"""tympan.data"""
