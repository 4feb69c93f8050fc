"""The embedded infrastructure: Mosquitto, a Kafka broker, the schema registry."""
