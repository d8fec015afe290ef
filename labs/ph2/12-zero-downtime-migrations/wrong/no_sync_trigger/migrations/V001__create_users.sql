-- The starting point: version 1 of the application reads and writes users.name.
CREATE TABLE users (
    id    serial PRIMARY KEY,
    name  text   NOT NULL,
    email text   NOT NULL
);
