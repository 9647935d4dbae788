"""fastdetr"""
