-- placeholder: the queue schema (owned by the queue work, issue 2)
CREATE TABLE IF NOT EXISTS gpuscale_placeholder (id integer);
