"""Feedback: true labels that clients send for earlier answers, joined with those answers and stored durably."""
