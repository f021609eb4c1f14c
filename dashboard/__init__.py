"""Library code behind the Streamlit app: cache reading, region search, metadata queries, rendering."""
