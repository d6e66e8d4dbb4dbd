"""tympan.train"""
