"""Selection: score tables joined to the instances, the top fraction kept, and a report to inspect it."""
